"""The task layer: prompts of every MiMo-Audio task (shared by training and inference), the audio
front end of the official demo, and turning generated ids into text and audio."""
