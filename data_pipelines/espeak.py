"""eSpeak NG speech synthesis through ctypes, using the library and data of the `espeakng-loader`
wheel."""

from __future__ import annotations

import ctypes

import espeakng_loader
import numpy as np

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_ESPEAK_RATE = 1
_ESPEAK_PITCH = 3
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)


class ESpeak:
    """One synthesiser per process (eSpeak NG keeps global state). `synth` returns int16 samples
    at `sample_rate` (22050 Hz)."""

    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
            cls._instance._init()
        return cls._instance

    def _init(self) -> None:
        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        data_parent = str(
            __import__("pathlib").Path(espeakng_loader.get_data_path()).parent
        ).encode()
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data_parent, 0)
        if rate <= 0:
            raise RuntimeError(
                f"espeak_Initialize failed ({rate}) with data in {data_parent.decode()}"
            )
        self.sample_rate = rate
        self._lib = lib
        self._chunks: list[np.ndarray] = []

        def collect(wav, n, _events):
            if wav and n > 0:
                self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
            return 0

        self._callback = _CALLBACK(collect)  # kept alive as long as the library may call it
        lib.espeak_SetSynthCallback(self._callback)

    def synth(self, text: str, voice: str, rate: int = 175, pitch: int = 50) -> np.ndarray:
        """`voice` as eSpeak names it (`"en+f3"`: language + variant); `rate` in words per
        minute."""
        lib = self._lib
        # The callback is process-wide: claim it again in case other code set its own since.
        lib.espeak_SetSynthCallback(self._callback)
        if lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(f"eSpeak NG has no voice {voice!r}")
        lib.espeak_SetParameter(_ESPEAK_RATE, int(rate), 0)
        lib.espeak_SetParameter(_ESPEAK_PITCH, int(pitch), 0)
        self._chunks = []
        buf = ctypes.create_string_buffer(text.encode("utf-8"))
        err = lib.espeak_Synth(buf, len(buf), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        if err != 0:
            raise RuntimeError(f"espeak_Synth failed ({err}) for {text!r}")
        lib.espeak_Synchronize()
        return np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)


def synthesize(text: str, voice: str = "en", words_per_minute: int = 175) -> tuple[np.ndarray, int]:
    """(float32 mono waveform in [-1, 1], sample rate (22050)): real speech for tests and
    benchmarks, no downloads."""
    tts = ESpeak()
    return tts.synth(text, voice, rate=words_per_minute).astype(
        np.float32
    ) / 32768.0, tts.sample_rate
