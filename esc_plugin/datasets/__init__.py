"""Toolkit-neutral dataset conventions (no torch, SpeechBrain or NeMo import).

:mod:`.speech_commands`: Speech Commands speaker ids and the speaker-disjoint
split shared by the honk task, the SpeechBrain recipes and the NeMo manifests.
"""
from .speech_commands import NOHASH, has_speaker_id, speaker_of, speaker_split

__all__ = ["NOHASH", "has_speaker_id", "speaker_of", "speaker_split"]
