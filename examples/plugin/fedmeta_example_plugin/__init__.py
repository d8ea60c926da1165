"""An example fedmeta plug-in: the ``blobs-fewshot`` task and the ``wide_mlp`` model."""
