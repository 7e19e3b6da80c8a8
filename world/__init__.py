"""The embedded world: pictures of 1-4 coloured shapes, their captions and the captions spoken, generated from a
seed, with exact judges (an image reader and a speech recogniser with the caption grammar).

It is the project's test bed, and everything here only makes sense for it: ``dataset`` (splits and the
compositional hold-out), ``render``, ``captions``, ``speech``, ``judge``, ``asr``, ``evaluate`` (the held-out
scores), and the plug-ins the world recipe names, which use what is known about these pictures (plain
backgrounds, object boxes, shapes and colours).
"""
