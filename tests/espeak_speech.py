"""Speech synthesised with eSpeak NG (the library and data shipped in the espeakng-loader wheel),
driven through ctypes: real speech for tests, no downloads."""
import ctypes
import functools

import espeakng_loader
import numpy as np

_SYNCHRONOUS = 2  # AUDIO_OUTPUT_SYNCHRONOUS: samples go to the callback, espeak_Synth blocks
_CHARS_UTF8 = 1
_RATE = 1  # espeakRATE parameter (words per minute)
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                             ctypes.c_void_p)


@functools.lru_cache(maxsize=1)
def _library():
    lib = ctypes.CDLL(espeakng_loader.get_library_path())
    lib.espeak_Initialize.restype = ctypes.c_int
    rate = lib.espeak_Initialize(_SYNCHRONOUS, 0, espeakng_loader.get_data_path().encode(), 0)
    if rate <= 0:
        raise RuntimeError("eSpeak NG failed to initialise")
    chunks: list[np.ndarray] = []

    def collect(wav, count, events):
        if count > 0:
            chunks.append(np.ctypeslib.as_array(wav, shape=(count,)).copy())
        return 0

    callback = _CALLBACK(collect)
    lib.espeak_SetSynthCallback(callback)
    return lib, rate, chunks, callback  # the callback object must stay alive


def synthesize(text: str, voice: str = "en", words_per_minute: int = 175) -> tuple[np.ndarray, int]:
    """(float32 mono waveform in [-1, 1], sample rate (22050))."""
    lib, rate, chunks, _ = _library()
    if lib.espeak_SetVoiceByName(voice.encode()) != 0:
        raise ValueError(f"eSpeak NG has no voice {voice!r}")
    lib.espeak_SetParameter(_RATE, words_per_minute, 0)
    chunks.clear()
    data = text.encode("utf-8") + b"\0"
    status = lib.espeak_Synth(data, len(data), 0, 0, 0, _CHARS_UTF8, None, None)
    if status != 0:
        raise RuntimeError(f"eSpeak NG synthesis failed with status {status}")
    lib.espeak_Synchronize()
    wav = np.concatenate(chunks) if chunks else np.zeros(0, np.int16)
    return wav.astype(np.float32) / 32768.0, rate
