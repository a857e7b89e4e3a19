"""Event sources: where records come from (pone, ksm, emulate, replay)."""
