"""Where frames come from and how they become the model's input: ``sources`` (the front door over folders,
``.npy`` files and OpenCV streams), ``video`` (OpenCV, the ``video`` extra), ``preprocess`` (timm's eval
transform in numpy)."""
