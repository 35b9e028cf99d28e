"""`Features`: the DELF features of one image, as the extractor returns them and as one row
of a features table holds them (schemas/features.py)."""

import dataclasses

import numpy as np


@dataclasses.dataclass
class Features:
    """DELF features of one image. Coordinates are original-image pixels, (x, y) = (column,
    row), pixel centres at integers; `scale` is 1 / (pyramid scale x pre-resize factor), the
    size of the feature's receptive field relative to `receptive_field` pixels."""

    x: np.ndarray  # float32 [N]
    y: np.ndarray  # float32 [N]
    scale: np.ndarray  # float32 [N]
    attention: np.ndarray  # float32 [N], the model's scores; rows are best first (the extractor's `selection`)
    descriptors: np.ndarray  # float32 [N, D], L2-normalised
    global_descriptor: np.ndarray  # float32 [G], L2-normalised
    width: int  # original image size
    height: int

    def __len__(self):
        return len(self.x)

    @property
    def keypoints(self):
        """[N, 2] array of (x, y)."""
        return np.stack([self.x, self.y], axis=1)

    def take(self, rows):
        """The features at `rows` (an index array, a boolean mask or a slice), in that order:
        a selection of these, e.g. the best n (`take(slice(n))`) or another ranking's order."""
        return dataclasses.replace(
            self, **{k: getattr(self, k)[rows] for k in ("x", "y", "scale", "attention", "descriptors")}
        )

    def rescaled(self, width, height):
        """The same features in the pixels of a (width, height) version of the image, e.g. the
        original of an image that was shrunk before extraction."""
        fx, fy = width / self.width, height / self.height
        return dataclasses.replace(
            self,
            x=((self.x + 0.5) * fx - 0.5).astype(np.float32),
            y=((self.y + 0.5) * fy - 0.5).astype(np.float32),
            scale=(self.scale * np.sqrt(fx * fy)).astype(np.float32),
            width=int(width),
            height=int(height),
        )

    def save(self, path):
        """Write to .npz (plain arrays, no pickle)."""
        np.savez_compressed(path, **dataclasses.asdict(self))

    @classmethod
    def load(cls, path):
        with np.load(path, allow_pickle=False) as data:
            fields = {f.name: data[f.name] for f in dataclasses.fields(cls)}
        fields["width"], fields["height"] = int(fields["width"]), int(fields["height"])
        return cls(**fields)

    @classmethod
    def from_row(cls, row, descriptor_dtype=np.float16, descriptor_dim=0):
        """The features of one features-table record (a dict, as pyarrow's to_pylist gives);
        the descriptors are the record's binary value, of `descriptor_dtype` and `descriptor_dim`
        (the table's: schemas.features.descriptor_layout)."""
        n = row["num_features"] or 0
        descriptors = np.frombuffer(row["descriptors"] or b"", descriptor_dtype).reshape(n, descriptor_dim if n else 0)
        return cls(
            x=np.asarray(row["x"], np.float32),
            y=np.asarray(row["y"], np.float32),
            scale=np.asarray(row["scale"], np.float32),
            attention=np.asarray(row["attention"], np.float32),
            descriptors=descriptors.astype(np.float32),
            global_descriptor=np.asarray(row["global_descriptor"], np.float32),
            width=int(row["width"]),
            height=int(row["height"]),
        )
