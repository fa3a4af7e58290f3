"""Time the FCMAE train step per sparse backend; the same as `fcmae bench` (options: --help).

    PYTHONPATH=. python bench/train_step.py --model convnextv2_tiny --batch-size 8 --image-size 224 --device cpu
"""
import sys

from fcmae.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
