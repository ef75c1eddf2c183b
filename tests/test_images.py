"""Tests for editeval.data.images; every odd-format file is created in tmp_path."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image, ImageFile

from editeval.data.images import (
    MAX_PIXELS,
    Geometry,
    ImageLoadError,
    MaskError,
    fit_to_resolution,
    load_image,
    load_mask,
    mask_to_array,
    same_aspect,
)

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def px(image: Image.Image, xy: tuple[int, int]) -> tuple[int, ...]:
    return tuple(int(v) for v in image.getpixel(xy))


def close(actual, expected, tol: int) -> bool:
    return all(abs(a - e) <= tol for a, e in zip(actual, expected, strict=True))


def colours(image: Image.Image) -> set[tuple[int, ...]]:
    return {tuple(c) for c in np.asarray(image).reshape(-1, 3).tolist()}


def assert_rgb(image: Image.Image, size: tuple[int, int]) -> None:
    assert isinstance(image, Image.Image)
    assert image.mode == "RGB"
    assert image.size == size


# --------------------------------------------------------------------------- #
# Orientation, transparency and modes
# --------------------------------------------------------------------------- #


def test_jpeg_exif_orientation_6_rotates_clockwise(tmp_path):
    stored = Image.new("RGB", (64, 32), BLUE)
    stored.paste(RED, (0, 0, 16, 16))  # red block in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "rotated.jpg"
    stored.save(path, quality=95, exif=exif)

    image = load_image(path)

    assert_rgb(image, (32, 64))  # width and height swapped
    assert close(px(image, (28, 4)), RED, 40)  # stored top-left -> top-right
    assert close(px(image, (4, 4)), BLUE, 40)
    assert close(px(image, (28, 60)), BLUE, 40)


def test_rgba_half_transparent_red_over_white():
    image = load_image(Image.new("RGBA", (4, 4), (255, 0, 0, 128)))
    assert_rgb(image, (4, 4))
    assert px(image, (1, 1)) == (255, 127, 127)


def test_fully_transparent_becomes_white(tmp_path):
    path = tmp_path / "clear.png"
    Image.new("RGBA", (5, 3), (12, 200, 7, 0)).save(path)
    image = load_image(path)
    assert_rgb(image, (5, 3))
    assert colours(image) == {WHITE}


def test_la_composited_over_white():
    image = load_image(Image.new("LA", (3, 3), (0, 128)))
    assert px(image, (0, 0)) == (127, 127, 127)


def test_palette_with_transparency_index(tmp_path):
    palette = Image.new("P", (4, 2))
    palette.putpalette([10, 20, 30, 200, 0, 0] + [0] * (256 * 3 - 6))
    palette.paste(1, (2, 0, 4, 2))  # right half: index 1 (red-ish), left: index 0
    path = tmp_path / "palette.png"
    palette.save(path, transparency=0)
    reopened = Image.open(path)
    assert reopened.mode == "P" and "transparency" in reopened.info
    reopened.close()

    image = load_image(path)
    assert_rgb(image, (4, 2))
    assert px(image, (0, 0)) == WHITE  # transparent index
    assert px(image, (3, 1)) == (200, 0, 0)


def test_palette_without_transparency():
    palette = Image.new("RGB", (4, 4), (30, 60, 90)).convert("P", palette=Image.Palette.ADAPTIVE)
    image = load_image(palette)
    assert_rgb(image, (4, 4))
    assert px(image, (0, 0)) == (30, 60, 90)


def test_rgb_colour_key_transparency_in_info():
    image = Image.new("RGB", (2, 1), (1, 2, 3))
    image.putpixel((1, 0), (9, 9, 9))
    image.info["transparency"] = (1, 2, 3)
    loaded = load_image(image)
    assert px(loaded, (0, 0)) == WHITE and px(loaded, (1, 0)) == (9, 9, 9)


def test_16bit_png_scaled_not_clipped(tmp_path):
    values = np.array([[65535, 32896, 0, 257]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as raw:  # 16 bits a sample (Pillow has named this mode "I" too)
        assert raw.mode in ("I;16", "I")

    image = load_image(path)
    assert_rgb(image, (4, 1))
    assert [px(image, (x, 0)) for x in range(4)] == [(255,) * 3, (128,) * 3, (0,) * 3, (1,) * 3]


@pytest.mark.parametrize(
    "image",
    [
        Image.frombytes("I;16B", (2, 1), bytes([0xFF, 0xFF, 0x80, 0x80])),
        Image.frombytes("I;16", (2, 1), bytes([0xFF, 0xFF, 0x80, 0x80])),
        Image.fromarray(np.array([[65535, 32896]], dtype=np.int32)),  # mode "I"
        Image.fromarray(np.array([[1.0, 128 / 255]], dtype=np.float32)),  # mode "F"
    ],
    ids=["I;16B", "I;16", "I", "F"],
)
def test_high_depth_modes(image):
    loaded = load_image(image)
    assert_rgb(loaded, (2, 1))
    assert px(loaded, (0, 0)) == (255, 255, 255)
    assert px(loaded, (1, 0)) == (128, 128, 128)


def test_float_mode_out_of_range_is_rejected():
    with pytest.raises(ImageLoadError, match=r"<PIL image>.*0\.\.1"):
        load_image(Image.fromarray(np.full((2, 2), 200.0, dtype=np.float32)))


def test_cmyk_jpeg(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path, quality=95)
    image = load_image(path)
    assert_rgb(image, (16, 16))
    assert close(px(image, (8, 8)), RED, 10)


@pytest.mark.parametrize("mode", ["YCbCr", "LAB", "HSV"])
def test_colour_spaces_to_rgb(mode):
    image = load_image(Image.new("RGB", (4, 4), (200, 40, 60)).convert(mode))
    assert_rgb(image, (4, 4))
    assert close(px(image, (0, 0)), (200, 40, 60), 8)


def test_grayscale_and_bilevel(tmp_path):
    path = tmp_path / "gray.png"
    Image.new("L", (3, 2), 77).save(path)
    assert colours(load_image(path)) == {(77, 77, 77)}
    bilevel = Image.new("1", (2, 1), 0)
    bilevel.putpixel((1, 0), 1)
    image = load_image(bilevel)
    assert [px(image, (x, 0)) for x in range(2)] == [(0, 0, 0), WHITE]


def test_bytes_input():
    buffer = io.BytesIO()
    Image.new("RGB", (7, 5), (1, 2, 3)).save(buffer, format="PNG")
    image = load_image(buffer.getvalue())
    assert_rgb(image, (7, 5))
    assert px(image, (6, 4)) == (1, 2, 3)


def test_pil_input_returns_new_image_and_source_untouched():
    source = Image.new("RGB", (3, 3), (5, 6, 7))
    image = load_image(source)
    assert image is not source
    image.putpixel((0, 0), (0, 0, 0))
    assert px(source, (0, 0)) == (5, 6, 7)


# --------------------------------------------------------------------------- #
# Numpy arrays
# --------------------------------------------------------------------------- #


def test_numpy_uint8_shapes():
    rgb = np.zeros((2, 3, 3), dtype=np.uint8)
    rgb[1, 2] = (10, 20, 30)
    image = load_image(rgb)
    assert_rgb(image, (3, 2))  # PIL size is (width, height)
    assert np.array_equal(np.asarray(image), rgb)

    gray = np.array([[0, 100]], dtype=np.uint8)
    assert np.array_equal(np.asarray(load_image(gray))[..., 0], gray)
    assert np.array_equal(np.asarray(load_image(gray[..., None]))[..., 1], gray)

    rgba = np.array([[[255, 0, 0, 128], [0, 0, 255, 255]]], dtype=np.uint8)
    assert [px(load_image(rgba), (x, 0)) for x in range(2)] == [(255, 127, 127), BLUE]


def test_numpy_uint16_bool_float():
    uint16 = np.array([[65535, 32896, 0]], dtype=np.uint16)
    assert np.asarray(load_image(uint16))[0, :, 0].tolist() == [255, 128, 0]

    flags = np.array([[True, False]])
    assert np.asarray(load_image(flags))[0, :, 0].tolist() == [255, 0]

    floats = np.array([[0.0, 0.5, 1.0, 0.2]], dtype=np.float64)  # 0.5 * 255 = 127.5 -> 128
    assert np.asarray(load_image(floats))[0, :, 0].tolist() == [0, 128, 255, 51]


@pytest.mark.parametrize("bad", [np.array([[0.0, 1.5]]), np.array([[-0.1, 0.5]]), np.array([[np.nan]])])
def test_numpy_float_out_of_range(bad):
    with pytest.raises(ImageLoadError, match=r"<array>.*0\.\.1") as info:
        load_image(bad)
    if not np.isnan(bad).any():
        assert f"{bad.min():g}" in str(info.value) and f"{bad.max():g}" in str(info.value)


@pytest.mark.parametrize(
    ("array", "fragment"),
    [
        (np.zeros((2, 2), dtype=np.int64), "int64"),
        (np.zeros((2, 2, 2), dtype=np.uint8), r"\(2, 2, 2\)"),
        (np.zeros((4,), dtype=np.uint8), r"\(4,\)"),
        (np.zeros((0, 3, 3), dtype=np.uint8), "empty"),
    ],
)
def test_numpy_bad_shape_or_dtype(array, fragment):
    with pytest.raises(ImageLoadError, match=rf"<array>.*{fragment}"):
        load_image(array)


# --------------------------------------------------------------------------- #
# Broken files and limits
# --------------------------------------------------------------------------- #


def test_truncated_jpeg_names_file(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    whole = io.BytesIO()
    Image.fromarray(noise).save(whole, format="JPEG", quality=90)
    path = tmp_path / "half.jpg"
    path.write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])

    with pytest.raises(ImageLoadError, match="half.jpg") as info:
        load_image(path)
    assert "truncated" in str(info.value)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # no global state changed


def test_random_bytes_named_png(tmp_path):
    path = tmp_path / "noise.png"
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 500, dtype=np.uint8).tobytes())
    with pytest.raises(ImageLoadError, match="noise.png"):
        load_image(path)


def test_corrupt_png_body(tmp_path):
    good = io.BytesIO()
    Image.new("RGB", (64, 64), (9, 9, 9)).save(good, format="PNG")
    data = bytearray(good.getvalue())
    data[60:-20] = bytes(len(data) - 80)  # keep signature/IHDR, zero the rest
    path = tmp_path / "corrupt.png"
    path.write_bytes(bytes(data))
    with pytest.raises(ImageLoadError, match="corrupt.png"):
        load_image(path)


def test_text_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("this is not an image\n")
    with pytest.raises(ImageLoadError, match="notes.txt.*not a recognised image format"):
        load_image(path)


def test_missing_file(tmp_path):
    with pytest.raises(ImageLoadError, match="missing.png.*not found"):
        load_image(tmp_path / "missing.png")


def test_directory(tmp_path):
    with pytest.raises(ImageLoadError, match="directory"):
        load_image(str(tmp_path))


def test_garbage_bytes():
    with pytest.raises(ImageLoadError, match="<bytes>"):
        load_image(b"not an image at all")


def test_unsupported_source_type():
    with pytest.raises(TypeError, match="int"):
        load_image(42)  # type: ignore[arg-type]


def test_decompression_bomb_rejected_before_decoding(tmp_path):
    whole = io.BytesIO()
    Image.new("L", (3000, 3000)).save(whole, format="PNG")
    data = whole.getvalue()
    # Cut the file just after the first IDAT chunk header: decoding it would
    # raise "truncated", so a size error proves the pixels were never decoded.
    path = tmp_path / "bomb.png"
    path.write_bytes(data[: data.index(b"IDAT") + 20])

    with pytest.raises(ImageLoadError, match="bomb.png") as info:
        load_image(path, max_pixels=1_000_000)
    message = str(info.value)
    assert "1,000,000" in message and "3000x3000" in message and "max_pixels=" in message
    assert "truncated" not in message


def test_max_pixels_applies_to_arrays_and_default():
    assert MAX_PIXELS == 64_000_000
    with pytest.raises(ImageLoadError, match="<array>.*limit"):
        load_image(np.zeros((10, 10), dtype=np.uint8), max_pixels=99)
    assert load_image(np.zeros((10, 10), dtype=np.uint8), max_pixels=100).size == (10, 10)


def test_pillow_bomb_error_is_wrapped(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("L", (100, 100)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 10,000 > 2 * 1000
    with pytest.raises(ImageLoadError, match="big.png.*MAX_IMAGE_PIXELS"):
        load_image(path)


def test_image_load_error_is_value_error():
    assert issubclass(ImageLoadError, ValueError) and issubclass(MaskError, ValueError)


# --------------------------------------------------------------------------- #
# Resolution
# --------------------------------------------------------------------------- #


def gradient(width: int, height: int) -> Image.Image:
    x = np.linspace(0, 255, width)[None, :]
    y = np.linspace(0, 255, height)[:, None]
    rgb = np.stack(np.broadcast_arrays(x + 0 * y, y + 0 * x, (x + y) / 2), axis=-1)
    return Image.fromarray(rgb.round().astype(np.uint8))


def psnr(a: Image.Image, b: Image.Image) -> float:
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return 10 * math.log10(255**2 / np.mean(diff**2))


def test_fit_to_resolution_4_3():
    resized, geometry = fit_to_resolution(gradient(1024, 768), 512)
    assert resized.size == (512, 384)
    assert geometry == Geometry(source_size=(1024, 768), model_size=(512, 384))


def test_fit_to_resolution_round_trip():
    source = gradient(1000, 333)
    resized, geometry = fit_to_resolution(source, 512)
    width, height = resized.size
    assert max(width, height) == 512 and width % 8 == 0 and height % 8 == 0
    assert abs(height - 333 * 512 / 1000) <= 4  # at most multiple / 2 stretch
    assert geometry.source_size == (1000, 333) and geometry.model_size == (width, height)

    back = geometry.to_source(resized)
    assert back.size == (1000, 333) and back.mode == "RGB"
    assert psnr(back, source) > 25


def test_fit_to_resolution_upscale_portrait_and_mode_kept():
    resized, geometry = fit_to_resolution(Image.new("L", (50, 100), 9), 256, multiple=64)
    assert resized.size == (128, 256) and resized.mode == "L"
    assert geometry.to_model(Image.new("L", (50, 100))).size == (128, 256)


def test_fit_to_resolution_tiny_side_is_at_least_multiple():
    resized, _ = fit_to_resolution(Image.new("RGB", (2000, 10)), 512)
    assert resized.size == (512, 8)


@pytest.mark.parametrize("resolution", [500, 0, -8, 512.0])
def test_fit_to_resolution_rejects_bad_resolution(resolution):
    with pytest.raises(ValueError, match=rf"resolution.*{resolution!r}"):
        fit_to_resolution(Image.new("RGB", (10, 10)), resolution)


def test_geometry_rejects_wrong_sizes():
    geometry = Geometry(source_size=(1000, 333), model_size=(512, 168))
    with pytest.raises(ValueError, match=r"512x168.*511x168"):
        geometry.to_source(Image.new("RGB", (511, 168)))
    with pytest.raises(ValueError, match=r"1000x333.*512x168"):
        geometry.to_model(Image.new("RGB", (512, 168)))


# --------------------------------------------------------------------------- #
# Masks
# --------------------------------------------------------------------------- #


def square_mask_array() -> np.ndarray:
    expected = np.zeros((8, 8), dtype=bool)
    expected[2:6, 3:7] = True
    return expected


def test_rgb_mask_with_white_square(tmp_path):
    image = Image.new("RGB", (8, 8), (0, 0, 0))
    image.paste(WHITE, (3, 2, 7, 6))
    path = tmp_path / "mask.png"
    image.save(path)

    mask = load_mask(path)
    assert mask.mode == "L" and mask.size == (8, 8)
    assert np.array_equal(mask_to_array(mask), square_mask_array())


def test_mask_resized_with_nearest_stays_binary():
    grey = Image.fromarray(square_mask_array().astype(np.uint8) * 255)
    mask = load_mask(grey, size=(16, 16))
    assert mask.size == (16, 16)
    assert set(np.unique(np.asarray(mask)).tolist()) <= {0, 255}
    assert np.array_equal(mask_to_array(mask), np.kron(square_mask_array(), np.ones((2, 2), bool)))
    odd = load_mask(grey, size=(13, 5))
    assert odd.size == (13, 5) and set(np.unique(np.asarray(odd)).tolist()) == {0, 255}


def test_mask_threshold():
    soft = np.array([[0, 99, 100, 200]], dtype=np.uint8)
    assert mask_to_array(load_mask(soft)).tolist() == [[False, False, False, True]]
    assert mask_to_array(load_mask(soft, threshold=100)).tolist() == [[False, False, True, True]]
    with pytest.raises(ValueError, match="threshold"):
        load_mask(soft, threshold=0)


def test_empty_mask():
    black = np.zeros((4, 4), dtype=np.uint8)
    with pytest.raises(MaskError, match="empty") as info:
        load_mask(black)
    assert "allow_empty" in str(info.value) and "<array>" in str(info.value)
    assert not mask_to_array(load_mask(black, allow_empty=True)).any()


def test_full_mask():
    white = Image.new("RGB", (4, 4), WHITE)
    with pytest.raises(MaskError, match="full") as info:
        load_mask(white)
    assert "allow_full" in str(info.value)
    assert mask_to_array(load_mask(white, allow_full=True)).all()


def test_rgba_brush_layer_uses_alpha(tmp_path):
    layer = Image.new("RGBA", (8, 8), (0, 0, 0, 0))  # transparent black background
    layer.paste((255, 255, 255, 255), (3, 2, 7, 6))  # opaque white stroke
    path = tmp_path / "stroke.png"
    layer.save(path)
    assert np.array_equal(mask_to_array(load_mask(path)), square_mask_array())

    black_ink = np.zeros((8, 8, 4), dtype=np.uint8)  # constant colour, alpha-painted
    black_ink[2:6, 3:7, 3] = 255
    assert np.array_equal(mask_to_array(load_mask(black_ink)), square_mask_array())


def test_rgba_coloured_mask_uses_luminance_over_white():
    rgba = np.zeros((1, 3, 4), dtype=np.uint8)
    rgba[0, 0] = (0, 0, 0, 255)  # opaque black: keep
    rgba[0, 1] = (255, 255, 255, 255)  # opaque white: edit
    rgba[0, 2] = (0, 0, 0, 0)  # transparent: white after compositing: edit
    assert mask_to_array(load_mask(rgba)).tolist() == [[False, True, True]]


def test_mask_bad_size():
    with pytest.raises(ValueError, match="size"):
        load_mask(np.eye(4, dtype=bool), size=(0, 4))


def test_mask_to_array_rejects_non_binary():
    with pytest.raises(MaskError, match="binary"):
        mask_to_array(Image.new("L", (2, 2), 128))
    with pytest.raises(MaskError, match="binary"):
        mask_to_array(Image.new("RGB", (2, 2)))
    bilevel = Image.new("1", (2, 1), 0)
    bilevel.putpixel((0, 0), 1)
    assert mask_to_array(bilevel).tolist() == [[True, False]]


def test_an_unreadable_mask_is_named_as_a_mask(tmp_path):
    with pytest.raises(ImageLoadError, match="^cannot load mask '.*absent.png': file not found"):
        load_mask(tmp_path / "absent.png")
    with pytest.raises(ImageLoadError, match="^cannot load mask <bytes>: not a recognised"):
        load_mask(b"not an image")
    with pytest.raises(ImageLoadError, match="^cannot load image <bytes>: not a recognised"):
        load_image(b"not an image")


@pytest.mark.parametrize("size, other, same", [
    ((120, 90), (120, 90), True),
    ((120, 90), (60, 45), True),
    ((120, 90), (61, 45), True),  # a pixel of rounding
    ((1024, 768), (512, 385), True),
    ((120, 90), (100, 100), False),
    ((120, 90), (60, 47), False),
    ((512, 512), (512, 384), False),
])
def test_same_aspect_allows_a_pixel_of_rounding(size, other, same):
    assert same_aspect(size, other) is same and same_aspect(other, size) is same
