"""The engine: taps on the attention modules, resolution levels, traces, CAMs, map arithmetic.

One forward (and one backward for CAMs) gives every attention map and every CAM; nothing here
draws or writes files.
"""
