"""Development tooling: tiny and trained models, full-size builders, the server launcher, the demo
and the benchmarks. Serving code (flux_triton, export, clients, model_repository) never imports it."""
