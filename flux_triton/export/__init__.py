"""Export stage: model folder -> served model repository."""
