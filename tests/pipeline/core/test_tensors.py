"""Layout conversions round-trip exactly and put channels where models expect them."""

import numpy as np

from pipeline.core.tensors import clip_to_tensor, image_to_tensor, tensor_to_clip, tensor_to_image


def test_clip_round_trip_and_layout():
    clip = np.random.default_rng(0).integers(0, 256, (2, 4, 6, 8, 3), dtype=np.uint8)
    tensor = clip_to_tensor(clip)
    assert tensor.shape == (2, 3, 4, 6, 8) and float(tensor.max()) <= 1.0
    assert round(float(tensor[1, 2, 3, 4, 5]) * 255) == clip[1, 3, 4, 5, 2]
    assert np.array_equal(tensor_to_clip(tensor), clip)


def test_image_round_trip():
    image = np.random.default_rng(1).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    assert image_to_tensor(image).shape == (3, 5, 7)
    assert np.array_equal(tensor_to_image(image_to_tensor(image)), image)
