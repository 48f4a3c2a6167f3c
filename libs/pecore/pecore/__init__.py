"""pecore: the science of pe-cbir (perceptual encryption + Cheng et al. 2016 retrieval), no web code."""
