"""The exporter's ONNX optimizer (`onnxscript.optimizer.optimize_ir`, what `torch.onnx.export(...,
optimize=True)` runs), with two changes that make it usable on FLUX's 12 B-parameter DiT.

- Without the `SlicesSplit` rewrite. It is the only default rule whose pattern has several output
  nodes, and onnxscript matches such patterns by trying every node of the graph for each candidate:
  quadratic in the graph's size, so at FLUX's real depth it does not finish (docs/export.md has the
  timings). It only merges Slices of one tensor into a Split, which TensorRT and onnxruntime do not
  need.
- Weights stay as they are: a `Transpose` of an initializer is not folded into a transposed copy.
  Folding it makes a host copy of every Linear weight of a graph traced on a GPU (the whole DiT),
  and those copies then save slowly; TensorRT folds the transposes at build time.
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript import optimizer, rewriter
from onnxscript.rewriter.rules.common import slice_split_rule

ITERATIONS = 2  # as optimize_ir's default


def rewrite_rules() -> tuple:
    """onnxscript's default rewrite rules without SlicesSplit."""
    # The default list has no public name; a missing one should fail loudly, not optimize less.
    defaults = rewriter._DEFAULT_REWRITE_RULES
    rules = tuple(rule for rule in defaults if rule is not slice_split_rule)
    if len(rules) != len(defaults) - 1:
        raise RuntimeError("onnxscript's default rewrite rules no longer hold SlicesSplit once")
    return rules


def keep_weight_transpose(node: ir.Node) -> bool | None:
    """The folding decision for `node`: False for a Transpose of an initializer, else the default."""
    if node.op_type == "Transpose" and node.domain == "" and node.inputs and node.inputs[0] is not None \
            and node.inputs[0].is_initializer():
        return False
    return None


class _FoldConstants(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = optimizer.fold_constants_ir(model, onnx_shape_inference=True,
                                             should_fold=keep_weight_transpose)
        return ir.passes.PassResult(model, result.modified)


def optimize(model: ir.Model) -> None:
    """Optimize an exported model in place, as optimize_ir does but for the two changes above."""
    passes = ir.passes.Sequential(
        common_passes.InlinePass(),
        ir.passes.PassManager(
            [_FoldConstants(), rewriter.RewritePass(rewrite_rules()),
             common_passes.RemoveUnusedNodesPass(), common_passes.RemoveUnusedFunctionsPass(),
             common_passes.RemoveUnusedOpsetsPass()],
            steps=ITERATIONS, early_stop=True,
        ),
        common_passes.RemoveUnusedNodesPass(),
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common_passes.LiftSubgraphInitializersToMainGraphPass(),
        common_passes.DeduplicateInitializersPass(),
        common_passes.CommonSubexpressionEliminationPass(),
        common_passes.OutputFixPass(),
        common_passes.NameFixPass(),
    )
    passes(model)
