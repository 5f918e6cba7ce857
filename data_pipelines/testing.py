"""Small synthetic data for tests and offline demos (no network).

`make_fake_emoji_tarball` builds a stand-in for the npm package
`emoji-datasource-<style>` with the real layout (`package/emoji.json`,
`package/img/<style>/64/<image>.png`): 30 emoji over 3 categories and 6
subcategories, plus one entry whose image is missing, one entry with skin
tone variants, and one with an empty name. The same emoji exist in both
styles and are recognisable in both: colour comes from the name ("red
smile"), shape from the category (circle, square, triangle), a white bar
from the subcategory (horizontal or vertical); the styles differ in size
and outline, like Noto and Twemoji differ, so a tiny model trained on one
style can be tested on the other.

`write_fake_shards` writes a few shards of solid-colour captioned images.
"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from PIL import Image, ImageDraw

from .writer import Record, write_shards

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 200, 30),
    "purple": (150, 50, 190),
}
# category -> (shape, [(subcategory, noun, bar direction)])
FAKE_EMOJI_CATEGORIES = {
    "Smileys & Emotion": ("circle", [("face-smiling", "smile", "horizontal"), ("face-sad", "frown", "vertical")]),
    "Animals & Nature": ("square", [("animal-mammal", "cat", "horizontal"), ("animal-bird", "bird", "vertical")]),
    "Food & Drink": ("triangle", [("food-fruit", "apple", "horizontal"), ("drink", "cup", "vertical")]),
}
MISSING_IMAGE_NAME = "GREY SMILE"
EMPTY_NAME_SHORT_NAME = "purple_cup"  # the entry whose "name" is empty
FAKE_VERSION = "0.0.0"


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def draw_fake_emoji(colour, shape: str, bar: str, style: str, size: int = 64) -> Image.Image:
    """A transparent-background icon; 'twitter' draws it smaller with an outline."""
    image = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    margin = size // 8 if style != "twitter" else size // 5
    box = (margin, margin, size - margin, size - margin)
    outline = (40, 40, 40, 255) if style == "twitter" else None
    width = 2 if style == "twitter" else 0
    fill = tuple(colour) + (255,)
    if shape == "circle":
        draw.ellipse(box, fill=fill, outline=outline, width=width)
    elif shape == "square":
        draw.rectangle(box, fill=fill, outline=outline, width=width)
    else:
        draw.polygon([(size // 2, margin), (size - margin, size - margin), (margin, size - margin)], fill=fill,
                     outline=outline)
    c, t = size // 2, max(2, size // 16)
    if bar == "horizontal":
        draw.rectangle((c - size // 5, c - t, c + size // 5, c + t), fill=(255, 255, 255, 255))
    else:
        draw.rectangle((c - t, c - size // 5, c + t, c + size // 5), fill=(255, 255, 255, 255))
    return image


def fake_emoji_entries(style: str) -> tuple[list[dict], dict[str, Image.Image]]:
    """emoji.json entries and the images (file name -> image) of the fake package."""
    entries, images = [], {}
    code = 0xE000
    sort_order = 0
    for category, (shape, subcategories) in FAKE_EMOJI_CATEGORIES.items():
        for subcategory, noun, bar in subcategories:
            for colour_name, colour in COLOURS.items():
                unified = f"{code:04X}"
                image_name = f"{code:04x}.png"
                short_name = f"{colour_name}_{noun}"
                name = f"{colour_name} {noun}".upper()
                entry = _entry(name, unified, image_name, [short_name], category, subcategory, sort_order)
                if short_name == EMPTY_NAME_SHORT_NAME:
                    entry["name"] = ""
                if short_name == "red_cat":
                    entry["short_names"].append("red_kitty")
                images[image_name] = draw_fake_emoji(colour, shape, bar, style)
                if sort_order == 0:  # skin tone variants: separate images the builder must not use
                    variant_image = f"{code:04x}-1f3fb.png"
                    entry["skin_variations"] = {
                        "1F3FB": {"unified": f"{unified}-1F3FB", "image": variant_image,
                                  f"has_img_{style}": True}
                    }
                    images[variant_image] = draw_fake_emoji((120, 80, 50), shape, bar, style)
                entries.append(entry)
                code += 1
                sort_order += 1
    # Listed in emoji.json, but its image is not in the package.
    entries.append(_entry(MISSING_IMAGE_NAME, f"{code:04X}", f"{code:04x}.png", ["grey_smile"],
                          "Smileys & Emotion", "face-smiling", sort_order))
    return entries, images


def _entry(name, unified, image, short_names, category, subcategory, sort_order) -> dict:
    return {
        "name": name,
        "unified": unified,
        "non_qualified": None,
        "image": image,
        "short_name": short_names[0],
        "short_names": list(short_names),
        "text": None,
        "texts": None,
        "category": category,
        "subcategory": subcategory,
        "sort_order": sort_order,
        "added_in": "1.0",
        "has_img_apple": True,
        "has_img_google": True,
        "has_img_twitter": True,
        "has_img_facebook": True,
    }


def make_fake_emoji_tarball(dest_dir: str | Path, style: str = "google") -> Path:
    """Write `emoji-datasource-<style>-0.0.0.tgz` (npm pack's naming) into dest_dir."""
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    path = dest_dir / f"emoji-datasource-{style}-{FAKE_VERSION}.tgz"
    entries, images = fake_emoji_entries(style)
    files = {
        "package/package.json": json.dumps({"name": f"emoji-datasource-{style}", "version": FAKE_VERSION}).encode(),
        "package/emoji.json": json.dumps(entries).encode(),
    }
    for name, image in sorted(images.items()):
        files[f"package/img/{style}/64/{name}"] = png_bytes(image)
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    return path


def solid_image(index: int, size: int = 24) -> Image.Image:
    """A distinct solid colour per index."""
    return Image.new("RGB", (size, size), ((index * 37) % 256, (index * 91) % 256, (index * 151) % 256))


def fake_records(num_samples: int, num_classes: int = 0, image_format: str = "png") -> list[Record]:
    """Captioned solid-colour images; with num_classes, also integer labels."""
    encode = png_bytes if image_format == "png" else jpeg_bytes
    records = []
    for i in range(num_samples):
        label = i % num_classes if num_classes else None
        records.append(Record(
            source_id=f"sample/{i:05d}.{image_format}",
            image=encode(solid_image(i)),
            captions=[f"sample {i}", f"colour number {i}", f"picture {i}"],
            label=label,
        ))
    return records


def write_fake_shards(out_dir: str | Path, num_samples: int = 40, per_shard: int = 10, prefix: str = "fake",
                      num_classes: int = 0, image_format: str = "png") -> list[str]:
    """Write captioned synthetic shards; returns the shard paths in order."""
    summary = write_shards(fake_records(num_samples, num_classes, image_format), out_dir, prefix, maxcount=per_shard)
    return [str(Path(out_dir) / name) for name in summary.shards]
