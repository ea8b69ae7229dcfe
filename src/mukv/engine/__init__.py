"""Sessions and decoding."""

from mukv.engine.events import Answer, DoneEvent, Event, Timings, TokenEvent
from mukv.engine.session import StreamSession

__all__ = ["Answer", "DoneEvent", "Event", "StreamSession", "Timings", "TokenEvent"]
