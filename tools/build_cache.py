"""Build the decoded-image cache of a training split ahead of training, with all CPUs.

Takes the training options (the same ``--dataset``, ``--data-root``, ``--label-map``,
``--data-cache`` ... as the train scripts; the others are accepted and ignored) and decodes every
image and label of the training split into the folder that training with those options reads
(``lib/data/cache.py``). Without it, the cache is built on the fly during the first epoch.

    python tools/build_cache.py --data-root data                     # Cityscapes, default folder
    python tools/build_cache.py --data-root data --data-cache shm    # in /dev/shm
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import argparse
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import cv2

from lib.common.log import setup_logging
from lib.data.cache import attach_cache
from lib.data.dataset import build_dataset
from lib.training.config import TrainConfig, parse_config
from lib.training.pipeline import auto_num_workers


def main(argv=None) -> pathlib.Path:
    pre = argparse.ArgumentParser(description=__doc__, add_help=False,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    pre.add_argument("--jobs", type=int, default=0,
                     help="threads decoding at once (default: the CPUs this process may use)")
    pre.add_argument("-h", "--help", action="store_true")
    known, rest = pre.parse_known_args(argv)
    if known.help:
        pre.print_help()
        print("\nand the training options, e.g. --dataset, --data-root, --data-cache")
        raise SystemExit(0)
    setup_logging(None, 0)
    log = logging.getLogger("bisenet")
    try:
        cfg = parse_config(TrainConfig(), rest)
        if cfg.data_cache == "off":
            raise ValueError("--data-cache off: there is no cache to build")
        dataset = build_dataset(cfg.data, "train", cfg.train_transform())
        cache = attach_cache(dataset, cfg.data_cache)
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"error: {exc}") from None
    if cache is None:
        raise SystemExit("error: no room for the cache (see the warning above)")
    jobs = known.jobs or auto_num_workers()[0] + 1
    tic = time.perf_counter()
    # threads, not processes: decoding (OpenCV) and writing release the GIL, and a pool of
    # forked or spawned processes could hang when one of them died
    cv2.setNumThreads(1)
    with ThreadPoolExecutor(jobs) as pool:
        for done, _ in enumerate(pool.map(lambda index: cache.load(index, dataset),
                                          range(len(dataset))), start=1):
            if done % 100 == 0 or done == len(dataset):
                log.info("%d/%d samples (%.1f s)", done, len(dataset), time.perf_counter() - tic)
    log.info("%s; built in %.1f s with %d threads", cache.survey().describe(),
             time.perf_counter() - tic, jobs)
    return cache.folder


if __name__ == "__main__":
    main()
