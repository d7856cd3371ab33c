"""A phone photo stored sideways with an EXIF Orientation tag reads upright everywhere a model sees it:
the shared decoder, the multimodal training collator and the server's image_url parts."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from nexus_core.io.images import open_upright


@pytest.fixture()
def sideways(tmp_path):
    """Stored 40 wide x 20 high, left half red; orientation 6 (rotate 90° clockwise to display):
    upright it is 20 wide x 40 high with red on top."""
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "photo.jpg"
    img.save(path, exif=exif.tobytes(), quality=95)
    return path


def _is_upright(im: Image.Image) -> None:
    assert im.size == (20, 40) and im.mode == "RGB"
    top, bottom = im.getpixel((10, 5)), im.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60


def test_the_shared_decoder_applies_the_orientation(sideways):
    with Image.open(sideways) as raw:
        assert raw.size == (40, 20)  # what PIL alone gives
    _is_upright(open_upright(sideways))
    _is_upright(open_upright(io.BytesIO(sideways.read_bytes())))
    assert open_upright(sideways, "L").mode == "L"


def test_training_and_serving_read_it_upright(sideways):
    from nexus_core.serve.app import _image_part
    from nexus_core.train.video import load_visuals

    (im,) = load_visuals([str(sideways)])  # the mm collator's image loader
    _is_upright(im)
    uri = "data:image/jpeg;base64," + base64.b64encode(sideways.read_bytes()).decode()
    _is_upright(_image_part({"url": uri}, "messages[0].content[0]"))
