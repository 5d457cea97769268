"""Adapters to other ReID toolkits.

Each adapter lives in its own module and imports its toolkit only when used, so importing
`reid_lite` never needs them: `reid_lite.integrations.torchreid` for torchreid / deep-person-reid.
"""
