"""Dataset readers, validation, synthetic phantoms, transforms and the training Dataset."""

from amlp_core.data.cases import Case, DatasetIndex, Problem, Sample, discover, read_case_image, read_case_label
from amlp_core.data.dataset import SegDataset, label_subset, load_samples, split_names, to_slices
from amlp_core.data.dicom import Series, find_series, read_seg, read_series, write_seg
from amlp_core.data.io import read_image, read_label, write_nifti
from amlp_core.data.partition import partition_names
from amlp_core.data.phantoms import (
    SiteStyle,
    make_phantom,
    make_phantom_samples,
    site_style,
    write_phantom_dataset,
)
from amlp_core.data.transforms import fit_to_roi, normalize_intensity, random_flip
from amlp_core.data.validate import DataReport, Expect, check_dataset, classes_of

__all__ = [
    "Case", "DataReport", "DatasetIndex", "Expect", "classes_of", "Problem", "Sample", "SegDataset", "Series",
    "SiteStyle", "check_dataset", "discover", "find_series", "fit_to_roi", "label_subset", "load_samples",
    "make_phantom", "make_phantom_samples", "normalize_intensity", "partition_names", "random_flip",
    "read_case_image", "read_case_label", "read_image", "read_label", "read_seg", "read_series", "site_style",
    "split_names", "to_slices", "write_nifti", "write_phantom_dataset", "write_seg",
]  # fmt: skip
