"""Training: the paper's samples, webdataset streams, the pretraining loop and the contrastive
pretraining of the vision encoder."""
