"""The MERGE configuration section's own keys and their defaults (method, schedule, budgets, plugins).

Each registered method adds its node MERGE.<NAME> (`registry.merge_section` builds the whole section);
`reid_lite.config` places that section in the full configuration.
"""

from __future__ import annotations

from yacs.config import CfgNode

# Token reduction inside the backbone's blocks (after attention, before the MLP).
MERGE_DEFAULTS = CfgNode()
MERGE_DEFAULTS.METHOD = "none"  # a registered method: reid_lite.merging.method_names() (none, tome, evit, stm, ...)
MERGE_DEFAULTS.R = 8  # tokens removed per merging block
MERGE_DEFAULTS.R_LIST = []  # per-layer r (same length as LAYERS); overrides R when set
MERGE_DEFAULTS.LAYERS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]  # 1-based block indices
# > 0: set the method's budget knob (r, EViT's keep rate, ATM's offset, LoTM's/DHTM's K) to meet this budget
# within BUDGET_TOLERANCE (reid_lite.compress.budget); image-dependent costs are averaged over CALIBRATION_IMAGES images
MERGE_DEFAULTS.TARGET_GFLOPS = 0.0
MERGE_DEFAULTS.BUDGET_TOLERANCE = 0.01  # the solved GFLOPs lie in [TARGET (1 - this), TARGET]
MERGE_DEFAULTS.CALIBRATION_IMAGES = 32
# > 0: the mildest setting of the same knob (r: the smallest constant r, 0 = merging off) whose measured latency
# per batch of TEST.IMS_PER_BATCH fits this budget on MODEL.DEVICE (reid_lite.compress.latency; tools/export.py)
MERGE_DEFAULTS.TARGET_LATENCY_MS = 0.0
MERGE_DEFAULTS.PROP_ATTN = True  # proportional attention (+log size on the keys) after a merge
MERGE_DEFAULTS.TRACE_SOURCE = False  # keep the patch -> token source map (visualisation)
# Methods from your own files: .py paths or module names, imported before the rest of the config is read.
MERGE_DEFAULTS.PLUGINS = []
# Each method's options live in its own node MERGE.<NAME>, declared with the method (reid_lite.merging:
# MERGE.STM in stm.py, MERGE.EVIT in evit.py) and added to the section by `registry.merge_section`.
