"""Library code, no Prefect imports: one slide's path, stage by stage.

``slide`` (read, tissue, stain) -> ``tiles`` (plan, ownership, stitch) -> ``infer``
(predictor, stream, workers) -> ``postprocess`` (watershed, labels, morphometry) ->
``outputs`` (layout, atomic, geoparquet, omezarr, overlays, qupath); ``batch`` runs one
slide end to end for a batch (run_slide, manifest, claims, cleanup, report); ``train``
holds the training-side code; ``config`` the typed settings and model card.
"""
