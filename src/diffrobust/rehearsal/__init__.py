"""Offline dress rehearsal of the paper-scale presets: official-format files made locally."""
