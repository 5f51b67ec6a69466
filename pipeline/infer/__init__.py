"""Using trained weights: batch inference on Ray Data, metrics, figures, predict's model and the registry."""
