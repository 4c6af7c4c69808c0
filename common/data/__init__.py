"""Dataset readers and generators of embedded demo data."""

from . import (category_text, classification_folders, cxr_datasets, cxr_findings, cxr_reports, cxr_tasks,
               demo_classification, demo_cxr, demo_exams, demo_polyps, demo_shapes, demo_volumes, exam_bags,
               fewshot_datasets, fewshot_episodes, fewshot_sources, generated, label_budget, mil_scores,
               polyp_folders, report_labels, volume_folders, wsss_images)
from .category_text import TextEmbeddingTable, read_descriptions
from .demo_shapes import ensure_demo_shapes
from .fewshot_episodes import EpisodeDataset, TrainingEpisodeDataset
from .demo_exams import ensure_demo_exam_dataset, make_demo_exam_dataset
from .exam_bags import BagDataset, exam_bag_datalist, instance_datalist, split_bags
from .demo_classification import ensure_demo_classification_dataset, make_demo_classification_dataset
from .demo_polyps import ensure_demo_polyp_dataset, make_demo_polyp_dataset
from .demo_volumes import ensure_demo_volume_dataset, make_demo_volume_dataset
from .report_labels import extract_polyp_label, make_report_labeller
from .polyp_folders import find_images, find_polyp_sets, polyp_datalist, require_role, resolve_roles
