"""Reading every supported format, spacing order, folders, and bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from spe import io
from spe.errors import SPEError


def test_reads_each_shared_dataset(datasets):
    heart = io.read_mask(datasets / "jsrt/train/labels/JPCLN001.png")
    assert heart.array.shape == (128, 128) and set(np.unique(heart.array)) == {0, 255}
    assert heart.spacing == (1.0, 1.0)

    polyp = io.read_image(
        datasets / "kvasir/train/images/cju0qkwl35piu0993l0dewei2.jpg"
    )
    assert polyp.array.shape == (218, 256, 3) and polyp.spacing == (1.0, 1.0)

    head = io.read_image(datasets / "hc18/train/images/000_HC.png")
    assert head.array.shape == (173, 256)

    labels = io.read_mask(datasets / "psfhs/train/labels/03746.mha")
    assert labels.array.shape == (256, 256) and set(np.unique(labels.array)) == {
        0,
        1,
        2,
    }

    atrium = io.read_image(datasets / "la3d/train/images/06SR5RBREL16DQ6M8LWS.nii.gz")
    # The NIfTI header says (x, y, z) = (91, 70, 44); arrays are (z, y, x).
    assert atrium.array.shape == (44, 70, 91)
    assert atrium.spacing == (1.25, 1.25, 1.25)


def test_spacing_is_in_array_order(tmp_path):
    volume = sitk.GetImageFromArray(np.zeros((4, 5, 6), dtype=np.int16))
    volume.SetSpacing((0.5, 0.7, 2.0))  # x, y, z
    for name in ("v.nii.gz", "v.nii", "v.mha", "v.nrrd"):
        sitk.WriteImage(volume, str(tmp_path / name))
        loaded = io.read_image(tmp_path / name)
        assert loaded.array.shape == (4, 5, 6)
        assert loaded.spacing == pytest.approx((2.0, 0.7, 0.5))


def test_saved_masks_read_back_unchanged(tmp_path):
    rng = np.random.default_rng(0)
    volume = rng.integers(0, 3, size=(4, 5, 6)).astype(np.uint8)
    path = tmp_path / "v.nii.gz"
    path.write_bytes(io.encode_mask(volume, (2.5, 0.7, 0.5), ".nii.gz"))
    loaded = io.read_mask(path)
    assert np.array_equal(loaded.array, volume)
    assert loaded.spacing == pytest.approx((2.5, 0.7, 0.5))

    # Labels above 255 need 16 bits; PNG keeps them.
    labels = np.array([[0, 1], [300, 2]])
    path = tmp_path / "m.png"
    path.write_bytes(io.encode_mask(labels, (1.0, 1.0), ".png"))
    assert np.array_equal(io.read_mask(path).array, labels)
    with pytest.raises(SPEError, match=r"needs \.nii\.gz"):
        io.encode_mask(volume, (1.0, 1.0, 1.0), ".png")


def test_two_dimensional_medical_and_one_slice_volume(tmp_path):
    image = sitk.GetImageFromArray(np.arange(12, dtype=np.uint8).reshape(3, 4))
    image.SetSpacing((0.3, 0.6))
    sitk.WriteImage(image, str(tmp_path / "a.mha"))
    loaded = io.read_mask(tmp_path / "a.mha")
    assert loaded.array.shape == (3, 4) and loaded.spacing == pytest.approx((0.6, 0.3))

    # nnU-Net stores 2-D cases as one-slice volumes.
    slab = sitk.GetImageFromArray(np.ones((1, 3, 4), dtype=np.uint8))
    sitk.WriteImage(slab, str(tmp_path / "b.nii.gz"))
    assert io.read_mask(tmp_path / "b.nii.gz").array.shape == (3, 4)


@pytest.mark.parametrize(
    ("name", "array"),
    [
        ("gray8.png", np.arange(64, dtype=np.uint8).reshape(8, 8)),
        ("gray16.png", (np.arange(64, dtype=np.uint16) * 1000).reshape(8, 8)),
        ("gray8.tif", np.arange(64, dtype=np.uint8).reshape(8, 8)),
        ("gray16.tif", (np.arange(64, dtype=np.uint16) * 1000).reshape(8, 8)),
        ("rgb.bmp", np.random.default_rng(0).integers(0, 255, (8, 8, 3), np.uint8)),
        ("rgb.tiff", np.random.default_rng(1).integers(0, 255, (8, 8, 3), np.uint8)),
    ],
)
def test_lossless_photo_formats_round_trip(tmp_path, name, array):
    Image.fromarray(array).save(tmp_path / name)
    loaded = io.read_image(tmp_path / name)
    np.testing.assert_array_equal(loaded.array, array)
    assert loaded.spacing == (1.0, 1.0)


def test_sixteen_bit_colour_tiff(tmp_path):
    array = (np.random.default_rng(2).integers(0, 60000, (6, 7, 3))).astype(np.uint16)
    image = sitk.GetImageFromArray(array, isVector=True)
    sitk.WriteImage(image, str(tmp_path / "rgb16.tif"))
    np.testing.assert_array_equal(io.read_image(tmp_path / "rgb16.tif").array, array)


def test_jpeg_and_spacing_override(tmp_path):
    Image.fromarray(np.full((10, 12), 128, np.uint8)).save(tmp_path / "a.jpg")
    loaded = io.read_image(tmp_path / "a.jpg", spacing=(0.2, 0.3))
    assert loaded.array.shape == (10, 12) and loaded.spacing == (0.2, 0.3)
    with pytest.raises(SPEError, match="one value per axis"):
        io.read_image(tmp_path / "a.jpg", spacing=(0.2, 0.3, 1.0))


def test_equal_channel_rgb_mask_is_gray(tmp_path):
    mask = np.zeros((8, 8), np.uint8)
    mask[2:5, 2:5] = 255
    Image.fromarray(np.stack([mask] * 3, axis=-1)).save(tmp_path / "m.png")
    np.testing.assert_array_equal(io.read_mask(tmp_path / "m.png").array, mask)


def test_unequal_channel_mask_is_an_error(tmp_path):
    colour = np.zeros((8, 8, 3), np.uint8)
    colour[2:5, 2:5, 0] = 255
    Image.fromarray(colour).save(tmp_path / "m.png")
    with pytest.raises(SPEError, match=r"m\.png: a colour mask with unequal channels"):
        io.read_mask(tmp_path / "m.png")


def test_truncated_file_is_an_error(tmp_path, datasets):
    data = (datasets / "jsrt/train/images/JPCLN001.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(SPEError, match=r"cut\.png: cannot read this file"):
        io.read_image(tmp_path / "cut.png")
    (tmp_path / "junk.nii.gz").write_bytes(b"not a nifti file at all")
    with pytest.raises(SPEError, match=r"junk\.nii\.gz: cannot read this file"):
        io.read_image(tmp_path / "junk.nii.gz")


def test_nan_in_image_is_an_error(tmp_path):
    array = np.ones((4, 4, 4), np.float32)
    array[1, 2, 3] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp_path / "nan.mha"))
    with pytest.raises(SPEError, match=r"nan\.mha: the image holds NaN"):
        io.read_image(tmp_path / "nan.mha")


def test_fractional_or_negative_mask_is_an_error(tmp_path):
    sitk.WriteImage(
        sitk.GetImageFromArray(np.full((3, 3), 0.4, np.float32)),
        str(tmp_path / "p.mha"),
    )
    with pytest.raises(SPEError, match="fractional values"):
        io.read_mask(tmp_path / "p.mha")
    sitk.WriteImage(
        sitk.GetImageFromArray(np.full((3, 3), -1, np.int16)), str(tmp_path / "n.mha")
    )
    with pytest.raises(SPEError, match="negative values"):
        io.read_mask(tmp_path / "n.mha")


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(SPEError, match="no such file"):
        io.read_image(tmp_path / "missing.png")
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(SPEError, match="unsupported file type"):
        io.read_image(tmp_path / "a.txt")


def test_case_ids_and_nnunet_channel_suffix(tmp_path):
    for name in ("case_a_0000.png", "case_b_0000.png", "case_b_0001.png"):
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / name)
    cases = io.list_image_cases(tmp_path, matching=["case_a", "case_b"])
    assert sorted(cases) == ["case_a", "case_b"]
    assert cases["case_b"].name == "case_b_0000.png"
    # Names that merely end in four digits stay case ids of their own.
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in ("scan_0000.png", "scan_0001.png"):
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(plain / name)
    assert sorted(io.list_image_cases(plain, matching=["scan_0000", "scan_0001"])) == [
        "scan_0000",
        "scan_0001",
    ]
    assert sorted(io.list_image_cases(plain)) == ["scan_0000", "scan_0001"]
    assert io.split_extension("x.y.nii.gz") == ("x.y", ".nii.gz")


def test_mask_suffix_is_read_only_when_it_makes_cases_match(tmp_path):
    for name in ("a_seg", "b_seg"):
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / f"{name}.png")
    assert set(io.list_mask_cases(tmp_path, matching=["a", "b"])) == {"a", "b"}
    # Cases genuinely named *_seg keep their names.
    kept = io.list_mask_cases(tmp_path, matching=["a_seg", "b_seg"])
    assert set(kept) == {"a_seg", "b_seg"}
    assert set(io.list_mask_cases(tmp_path)) == {"a_seg", "b_seg"}

    # A labeled folder whose labels carry the suffix and images nnU-Net's.
    root = tmp_path / "labeled"
    for folder, suffix in (("images", "_0000"), ("labels", "_seg")):
        (root / folder).mkdir(parents=True)
        for case in ("a", "b"):
            path = root / folder / f"{case}{suffix}.png"
            Image.fromarray(np.zeros((4, 4), np.uint8)).save(path)
    assert io.open_labeled_folder(root).case_ids == ["a", "b"]


def test_unmatched_cases_are_named(tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "g").mkdir()
    for folder, names in (("p", ["a", "b"]), ("g", ["a", "c"])):
        for name in names:
            Image.fromarray(np.zeros((4, 4), np.uint8)).save(
                tmp_path / folder / f"{name}.png"
            )
    predictions = io.list_cases(tmp_path / "p")
    labels = io.list_cases(tmp_path / "g")
    with pytest.raises(SPEError, match=r"in .*p have no match .*: b;.* in .*g .*: c"):
        io.match_cases(
            predictions,
            labels,
            first_name=str(tmp_path / "p"),
            second_name=str(tmp_path / "g"),
        )


def test_duplicate_case_ids_and_empty_folder(tmp_path):
    with pytest.raises(SPEError, match="holds no image files"):
        io.list_cases(tmp_path)
    # A labeled folder given where its labels/ was meant: the error says so.
    (tmp_path / "labels").mkdir()
    with pytest.raises(SPEError, match=r"did you mean .*labels\?"):
        io.list_cases(tmp_path)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "a.bmp")
    with pytest.raises(SPEError, match="are both case 'a'"):
        io.list_cases(tmp_path)


def test_spacing_table(tmp_path, datasets):
    table = io.read_spacing_table(datasets / "hc18" / "spacing.csv")
    assert table["000_HC"] == pytest.approx((0.216049387,))
    assert io.expand_spacing(table["000_HC"], 2) == pytest.approx((0.216049387,) * 2)
    (tmp_path / "bad.csv").write_text("case_id,mm\na,zero\n")
    with pytest.raises(SPEError, match="must be numbers"):
        io.read_spacing_table(tmp_path / "bad.csv")
