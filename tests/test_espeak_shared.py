"""The eSpeak NG synthesiser keeps working when other code in the process registers its own output
callback with the library (a process-wide setting): the demo corpus must never come out silent
because of what ran before it."""

import ctypes

import espeakng_loader

from data_pipelines.espeak import _CALLBACK, ESpeak


def test_synth_survives_a_foreign_callback():
    tts = ESpeak()
    before = tts.synth("Hello there.", "en")
    assert before.size > 0
    foreign = []
    callback = _CALLBACK(lambda wav, n, events: foreign.append(n) or 0)
    ctypes.CDLL(espeakng_loader.get_library_path()).espeak_SetSynthCallback(callback)
    after = tts.synth("Hello there.", "en")
    assert after.size > 0.9 * before.size and not foreign
