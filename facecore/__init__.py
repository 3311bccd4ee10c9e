"""facecore: the face library behind facejobs (PyTorch, OpenCV, dlib; never Ray)."""

__version__ = "0.1.0"
