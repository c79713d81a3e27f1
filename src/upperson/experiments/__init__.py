"""Applications of the library: ablation studies, cross-domain matrices, profiling and the demo."""
