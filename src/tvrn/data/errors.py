"""Errors raised by the data layer.

Every error names what is wrong and where: the file, the (0-based) image / region index or the (1-based)
line number, and the counts involved. Catch `TvrnDataError` to handle all of them.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence


class TvrnDataError(Exception):
    """Base class of every error raised while reading or preparing data."""


class MissingFileError(TvrnDataError, FileNotFoundError):
    """A required file of a precomp split is not there."""

    def __init__(self, path: "str | os.PathLike[str]", what: str = "file"):
        self.path = str(path)
        super().__init__(f"missing {what}: expected {self.path}")


class CaptionCountError(TvrnDataError):
    """Captions and images of a split do not match either supported layout."""

    def __init__(self, num_images: int, num_captions: int, images_file: str, captions_file: str):
        self.num_images = num_images
        self.num_captions = num_captions
        self.images_file = images_file
        self.captions_file = captions_file
        super().__init__(
            f"{images_file} has N_img={num_images} images but {captions_file} has N_caps={num_captions} "
            f"captions; expected either N_caps == 5 * N_img (5 captions per image) or N_img == N_caps with "
            f"N_caps a positive multiple of 5 (each image repeated 5 times)"
        )


class CaptionMapError(TvrnDataError):
    """A caption -> image map (SPLIT_cap2img.txt) that does not fit the captions or the images."""

    def __init__(self, file: str, line_number: Optional[int], problem: str):
        self.file, self.line_number, self.problem = file, line_number, problem
        where = f" at line {line_number}" if line_number is not None else ""
        super().__init__(f"{file}{where}: {problem}")


class NonFiniteFeatureError(TvrnDataError):
    """A feature (or box / size) row contains NaN or inf."""

    def __init__(self, file: str, image_index: int, what: str = "features"):
        self.file = file
        self.image_index = image_index
        super().__init__(f"non-finite values (NaN or inf) in the {what} of image {image_index} in {file}")


class DegenerateBoxError(TvrnDataError):
    """A region box with x2 < x1 or y2 < y1 (or non-finite coordinates)."""

    def __init__(self, image_index, region_index: int, box: Sequence[float], file: Optional[str] = None):
        self.file = file
        self.image_index = image_index
        self.region_index = region_index
        self.box = tuple(float(v) for v in box)
        where = f" in {file}" if file else ""
        x1, y1, x2, y2 = self.box
        super().__init__(
            f"degenerate box{where}: image {image_index}, region {region_index}, "
            f"box (x1, y1, x2, y2) = ({x1:g}, {y1:g}, {x2:g}, {y2:g}); need finite x1 <= x2 and y1 <= y2"
        )


class EmptyCaptionError(TvrnDataError):
    """A caption line is empty after stripping whitespace."""

    def __init__(self, file: str, line_number: int):
        self.file = file
        self.line_number = line_number
        super().__init__(f"empty caption in {file} at line {line_number}")


class VocabularyError(TvrnDataError):
    """A vocabulary file cannot be read or is inconsistent."""

    def __init__(self, file: "str | os.PathLike[str]", problem: str):
        self.file = str(file)
        self.problem = problem
        super().__init__(f"invalid vocabulary file {self.file}: {problem}")


class FeatureFileError(TvrnDataError):
    """A .npy file of a split has the wrong shape, dtype or layout, or disagrees with the others."""

    def __init__(self, file: str, problem: str):
        self.file = file
        self.problem = problem
        super().__init__(f"{file}: {problem}")


class TextEncodingError(TvrnDataError, ValueError):
    """A text file of a split (captions, ids, caption map) that is not UTF-8: names the file, the (1-based) line
    and the (0-based) byte offset of the first byte that is not UTF-8."""

    def __init__(self, file: str, line_number: int, byte_offset: int, byte: Optional[int] = None, reason: str = ""):
        self.file, self.line_number, self.byte_offset, self.byte = str(file), line_number, byte_offset, byte
        what = f"byte 0x{byte:02x} at byte offset {byte_offset}" if byte is not None else f"byte offset {byte_offset}"
        why = f", {reason}" if reason else ""
        super().__init__(f"{self.file} is not UTF-8 text: line {line_number}, {what}{why}; save the file as UTF-8")


def utf8_error_position(data: bytes) -> Optional[tuple[int, int, int, str]]:
    """Where bytes stop being UTF-8 -> (1-based line, byte offset, the byte, reason), or None if they are UTF-8.
    Lines end at \\n, \\r\\n or \\r, as a text-mode read counts them."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        head = data[: e.start].decode("utf-8")
        line = head.replace("\r\n", "\n").replace("\r", "\n").count("\n") + 1
        return line, e.start, data[e.start], e.reason
    return None


def text_encoding_error(path: "str | os.PathLike[str]") -> Optional[TextEncodingError]:
    """The TextEncodingError of a file that is not UTF-8 (its first bad byte), or None when it is UTF-8."""
    with open(path, "rb") as f:
        where = utf8_error_position(f.read())
    return None if where is None else TextEncodingError(os.fspath(path), *where)
