"""Image data for pretraining and fine-tuning: folders, ImageFolder trees, webdataset shards, the demo digits."""
from fcmae.data.build import ImageData, build_image_data, detect_format

__all__ = ["ImageData", "build_image_data", "detect_format"]
