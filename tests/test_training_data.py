"""Training data layer: folder / tar-shard / toy datasets, collate, the step sampler and cached latents."""

import io
import itertools
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from lcm_lab.toy.world import ToyWorld
from lcm_lab.training.data import (
    DataConfig, ImageCaptionFolder, StepBatchSampler, TarShards, ToyImages, build_dataset, collate,
    encode_dataset, make_dataloader, random_hflip,
)

pytestmark = pytest.mark.usefixtures("single_thread_torch")


def as_pixels(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture()
def folder(tmp_path):
    return ToyWorld(0, "train").write_folder(tmp_path / "f", n=8)


def test_folder_matches_toy_world(folder):
    ds = build_dataset(DataConfig(type="folder", path=str(folder)))
    assert isinstance(ds, ImageCaptionFolder) and len(ds) == 8
    world = ToyWorld(0, "train")
    for i in range(8):
        item, sample = ds[i], world[i]
        assert item["index"] == i and item["text"] == sample.caption
        assert item["pixel_values"].shape == (3, 32, 32)
        torch.testing.assert_close(item["pixel_values"], as_pixels(sample.image), rtol=0, atol=0)
    assert ds[0]["pixel_values"].min() >= -1 and ds[0]["pixel_values"].max() <= 1


def test_toy_images_equal_folder(folder):
    toy, disk = build_dataset(DataConfig(num_images=4)), ImageCaptionFolder(folder)
    assert isinstance(toy, ToyImages) and len(toy) == 4
    for i in range(4):
        assert toy[i]["text"] == disk[i]["text"]
        assert torch.equal(toy[i]["pixel_values"], disk[i]["pixel_values"])
    with pytest.raises(IndexError):
        toy[4]


def test_unreadable_items_are_skipped(folder):
    (folder / "0000002.png").write_bytes(b"not a png at all")
    data = (folder / "0000005.png").read_bytes()
    (folder / "0000005.png").write_bytes(data[: len(data) // 2])  # truncated
    (folder / "0000006.png").unlink()
    ds = ImageCaptionFolder(folder)
    assert [i for i in range(8) if ds[i] is None] == [2, 5, 6]
    batch = collate([ds[i] for i in range(8)])
    assert batch["skipped"] == 3 and batch["index"].tolist() == [0, 1, 3, 4, 7]
    assert batch["pixel_values"].shape == (5, 3, 32, 32) and len(batch["text"]) == 5
    empty = collate([None, None])
    assert empty["skipped"] == 2 and empty["pixel_values"].shape[0] == 0 and empty["text"] == []


def test_missing_caption_is_skipped(folder):
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    del rows[1]["text"]
    rows[3]["text"], rows[4]["text"] = "", "  \n"  # empty captions: skipped (and so counted) too
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = ImageCaptionFolder(folder)
    assert [i for i in range(8) if ds[i] is None] == [1, 3, 4]


def test_construction_errors(tmp_path, folder):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageCaptionFolder(tmp_path / "nowhere")
    (tmp_path / "bare").mkdir()
    with pytest.raises(FileNotFoundError, match="metadata.jsonl.*caption"):
        ImageCaptionFolder(tmp_path / "bare")
    (folder / "metadata.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="lists no images"):
        ImageCaptionFolder(folder)
    with pytest.raises(ValueError, match="unknown data type 'parquet'"):
        DataConfig(type="parquet")
    with pytest.raises(ValueError, match="needs a path"):
        DataConfig(type="webdataset")
    with pytest.raises(ValueError, match="no .tar shards"):
        TarShards(str(tmp_path / "bare"))
    (folder / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "a"}\n[1, 2]\n')
    with pytest.raises(ValueError, match="metadata.jsonl:2 is not a JSON object"):
        ImageCaptionFolder(folder)
    # a caption column no row has: named as such, not as unreadable images
    (folder / "metadata.jsonl").write_text('{"file_name": "0000000.png", "caption": "a red circle"}\n')
    with pytest.raises(ValueError, match=r"no row of .*metadata.jsonl has the key 'text' \(data.caption_column\); "
                                         r"its rows have \['caption', 'file_name'\]"):
        ImageCaptionFolder(folder)
    assert ImageCaptionFolder(folder, caption_column="caption")[0]["text"] == "a red circle"
    with pytest.raises(ValueError, match=r"has the key 'image' \(data.image_column\)"):
        ImageCaptionFolder(folder, image_column="image", caption_column="caption")
    (tmp_path / "bare" / "broken.tar").write_bytes(b"\x01" * 1024)
    with pytest.raises(ValueError, match="shard .*broken.tar is not a readable uncompressed tar"):
        TarShards(str(tmp_path / "bare"))


def test_tar_shards(tmp_path):
    world = ToyWorld(1, "train")
    samples = [world[i] for i in range(5)]

    def add(tar, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    (tmp_path / "shards").mkdir()
    with tarfile.open(tmp_path / "shards" / "000.tar", "w") as tar:
        for i in range(3):
            add(tar, f"s{i:03d}.png", png_bytes(samples[i].image))
            if i == 1:  # a .json caption with the "caption" key
                add(tar, f"s{i:03d}.json", json.dumps({"caption": samples[i].caption, "w": 32}).encode())
            else:
                add(tar, f"s{i:03d}.txt", samples[i].caption.encode())
    with tarfile.open(tmp_path / "shards" / "001.tar", "w") as tar:
        for i in range(3, 5):  # captions before images: grouping does not depend on order
            add(tar, f"d/s{i:03d}.txt", samples[i].caption.encode())
            add(tar, f"d/s{i:03d}.png", png_bytes(samples[i].image))
        add(tar, "d/orphan.txt", b"caption without an image")
        add(tar, "d/nocap.png", png_bytes(samples[0].image))
    for path in (tmp_path / "shards", str(tmp_path / "shards" / "*.tar")):
        ds = build_dataset(DataConfig(type="webdataset", path=str(path)))
        assert isinstance(ds, TarShards) and len(ds) == 6  # 5 samples + one without a caption
        items = [ds[i] for i in range(len(ds))]
        assert items[5] is None  # nocap.png
        for sample, item in zip(samples, items):
            assert item["text"] == sample.caption
            assert torch.equal(item["pixel_values"], as_pixels(sample.image))
    one = TarShards(str(tmp_path / "shards" / "001.tar"))
    assert len(one) == 3 and one[0]["text"] == samples[3].caption
    one.close()


def test_resize_and_center_crop(tmp_path):
    # 64 wide x 48 high: the shorter side goes to 32 (-> 43x32), then 5 columns are cropped on the left.
    image = np.zeros((48, 64, 3), np.uint8)
    image[:, 32:] = 255
    root = tmp_path / "r"
    root.mkdir()
    Image.fromarray(image).save(root / "a.png")
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "half"}) + "\n")
    item = ImageCaptionFolder(root, resolution=32)[0]
    assert item["pixel_values"].shape == (3, 32, 32)
    row = item["pixel_values"][0, 16]
    assert (row[:14] == -1).all() and (row[-14:] == 1).all()  # the edge sits at 21.3 - 5 = 16.3 px


def test_16_bit_grayscale_images_read_as_their_8_bit_levels(tmp_path):
    """PIL's convert("RGB") clips 16-bit levels at 255 (a white image); every image reader scales them."""
    from lcm_lab.eval.evaluate import load_reference_images
    from lcm_lab.imaging import load_images

    levels = np.tile(np.linspace(0, 255, 32).round().astype(np.uint8), (32, 1))  # a horizontal ramp
    Image.fromarray(levels.astype(np.uint16) * 257).save(tmp_path / "wide.png")  # 0..65535, mode I;16
    assert Image.open(tmp_path / "wide.png").mode == "I;16"
    rgb = torch.from_numpy(np.repeat(levels[..., None], 3, axis=2)).permute(2, 0, 1)
    root = tmp_path / "data"
    root.mkdir()
    (root / "a.png").write_bytes((tmp_path / "wide.png").read_bytes())
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "a ramp"}) + "\n")
    assert torch.equal(ImageCaptionFolder(root, resolution=32)[0]["pixel_values"], rgb.float() / 127.5 - 1)
    assert torch.equal(load_images([str(tmp_path / "wide.png")], 32), rgb[None].float() / 255)
    assert torch.equal(load_reference_images([tmp_path / "wide.png"], 32), rgb[None])
    # PIL's 32-bit "I" (how it opens a 16-bit PGM): 16-bit levels are scaled, levels within 0..255 kept
    from lcm_lab.imaging import to_rgb

    for stored in (levels.astype(np.int32) * 257, levels.astype(np.int32)):
        image = Image.fromarray(stored)
        assert image.mode == "I" and np.array_equal(np.asarray(to_rgb(image))[..., 0], levels)
    # 32-bit float levels have no agreed range: refused (PIL's convert would clip 0..1 floats to black)
    Image.fromarray(levels.astype(np.float32) / 255).save(tmp_path / "float.tif")
    assert Image.open(tmp_path / "float.tif").mode == "F"
    with pytest.raises(ValueError, match=r"cannot read init image .*float.tif: 32-bit float image \(PIL mode F\)"):
        load_images([str(tmp_path / "float.tif")], 32)
    with pytest.raises(ValueError, match="cannot read reference image .*float.tif: 32-bit float"):
        load_reference_images([tmp_path / "float.tif"], 32)
    (root / "b.tif").write_bytes((tmp_path / "float.tif").read_bytes())
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "b.tif", "text": "floats"}) + "\n")
    assert ImageCaptionFolder(root, resolution=32)[0] is None  # a counted skip in training data


def test_random_hflip_is_a_function_of_the_generator():
    images = torch.arange(64 * 3 * 2 * 4, dtype=torch.float32).view(64, 3, 2, 4)
    a = random_hflip(images, torch.Generator().manual_seed(5))
    b = random_hflip(images, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)  # same step generator, same flips: a resumed run replays them
    flipped = (a == images.flip(-1)).flatten(1).all(1)
    assert (flipped | (a == images).flatten(1).all(1)).all()  # each image is either kept or mirrored whole
    assert 16 < int(flipped.sum()) < 48  # p = 0.5
    assert not torch.equal(a, random_hflip(images, torch.Generator().manual_seed(6)))
    with pytest.raises(ValueError, match="random_flip and cache_latents"):
        DataConfig(random_flip=True, cache_latents=True)


def test_step_batch_sampler():
    def first(n, **kw):
        return list(itertools.islice(StepBatchSampler(100, 4, seed=kw.pop("seed", 7), **kw), n))

    full = first(10)
    assert len(full) == 10 and all(len(b) == 4 and all(0 <= i < 100 for i in b) for b in full)
    assert full == first(10)
    assert full[3] == np.random.default_rng([7, 0, 3]).integers(100, size=4).tolist()
    assert first(4, start_step=6) == full[6:]
    assert full != first(10, rank=1)
    assert full != first(10, seed=8)


def test_make_dataloader_resumes(folder):
    ds = ImageCaptionFolder(folder)
    it = iter(make_dataloader(ds, batch_size=3, seed=1))
    batches = [next(it) for _ in range(4)]
    resumed = next(iter(make_dataloader(ds, batch_size=3, seed=1, start_step=2)))
    assert resumed["index"].tolist() == batches[2]["index"].tolist() == StepBatchSampler(8, 3, 1).batch(2)
    assert torch.equal(resumed["pixel_values"], batches[2]["pixel_values"])


@pytest.fixture(scope="module")
def vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=8, sample_size=32,
    ).eval()


def test_encode_dataset_skips_unreadable_items_and_matches_the_vae(folder, vae):
    (folder / "0000003.png").write_bytes(b"garbage")
    ds = ImageCaptionFolder(folder)
    cache, skipped = encode_dataset(ds, vae, batch_size=3, progress=False)
    assert skipped == 1 and len(cache) == 7 and cache.index.tolist() == [0, 1, 2, 4, 5, 6, 7]
    assert cache.mean.shape == cache.std.shape == (7, 4, 16, 16)
    kept = [ds[i] for i in cache.index.tolist()]
    with torch.no_grad():
        dist = vae.encode(torch.stack([x["pixel_values"] for x in kept])).latent_dist
    torch.testing.assert_close(cache.mean, dist.mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache.std, dist.std, rtol=1e-5, atol=1e-5)
    assert cache.text == [x["text"] for x in kept]

    mean, std, texts = cache.batch([4, 0, 4])
    assert torch.equal(mean[0], cache.mean[4]) and torch.equal(std[1], cache.std[0]) and texts[2] == cache.text[4]
    # the VAE sees at most chunk_size images per call (a 512 px batch of 256 at once needs ~160 GiB), same cache
    sizes, encode = [], vae.encode
    vae.encode = lambda x: sizes.append(len(x)) or encode(x)
    chunked, _ = encode_dataset(ds, vae, batch_size=3, progress=False, chunk_size=2)
    assert sizes == [2, 1, 2, 2]  # loader batches of 3, 2 (one unreadable) and 2 readable items
    torch.testing.assert_close(chunked.mean, cache.mean, rtol=1e-5, atol=1e-6)
    assert chunked.text == cache.text


def test_init_images_are_turned_upright_by_their_exif_orientation(tmp_path):
    """A phone photo stored sideways with EXIF Orientation=6 (rotate 90 degrees clockwise to view) loads upright,
    as diffusers' load_image gives it to its img2img pipelines."""
    from diffusers.utils import load_image

    from lcm_lab.imaging import load_images

    stored = np.zeros((32, 64, 3), np.uint8)
    stored[:, :32] = 255  # the left half white, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    Image.fromarray(stored).save(tmp_path / "phone.png", exif=exif)
    upright = np.asarray(load_image(str(tmp_path / "phone.png")))
    assert upright.shape == (64, 32, 3) and upright[:32].min() == 255 and upright[32:].max() == 0  # top half white
    ours = load_images([str(tmp_path / "phone.png")], 32)[0]
    assert ours[:, :12].min() > 0.99 and ours[:, -12:].max() < 0.01  # top rows white, bottom rows black
