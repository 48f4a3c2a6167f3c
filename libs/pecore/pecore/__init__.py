"""pecore: the science of pe-cbir (perceptual encryption + Cheng 2016 retrieval); no web code."""
