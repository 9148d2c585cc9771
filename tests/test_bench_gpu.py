"""bench-gpu's bookkeeping: kernel names from an H100 profile sorted into kinds, and the table."""

import pytest

from devtools.bench_gpu import kernel_kind, table

pytestmark = pytest.mark.fast


@pytest.mark.parametrize("name, kind", [
    ("nvjet_sm90_qqtst_128x128_128x6_1x2_h_bz_ovscale_bias_TNT", "float8 matmul"),
    ("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_bias_TNT", "matmul"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x128", "attention"),
    ("triton_red_fused__fused_rms_norm__scaled_dot_product_cudnn_attention__to_copy_add", "fused (inductor)"),
    ("triton_poi_fused__scaled_mm__to_copy_cat_clamp_div_gelu_permute_t_unsqueeze_view_5",
     "fused (inductor)"),
    ("void at::native::vectorized_elementwise_kernel<4>", "other"),
])
def test_profiled_kernels_are_sorted_by_what_they_do(name, kind):
    assert kernel_kind(name) == kind


def test_table_gives_the_ratios_of_each_row():
    row = {"a": {"e2e_s": 0.9, "dit_step_ms": 170.0}, "b": {"e2e_s": 0.5, "dit_step_ms": 120.0,
                                                            "first_preview_s": 0.13},
           "c": {"e2e_s": 0.45, "bls_dit_call_ms": 121.0, "first_preview_s": 0.15}}
    lines = table({"rows": {"schnell/FP8/1": row}}).splitlines()
    assert lines[2] == ("| schnell | FP8 | 1 | 0.900 | 0.500 | 0.450 | 2.00 | 0.900 | "
                        "170.0 / 120.0 / 121.0 | 130 / 150 |")
