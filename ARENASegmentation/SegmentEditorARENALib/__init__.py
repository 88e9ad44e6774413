"""The ARENA Segment Editor effect (loaded by path by the Segment Editor; see SegmentEditorEffect.py)."""
