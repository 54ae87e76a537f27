"""Training side of IRCR-Net: data, augmentation, Mean Teacher, MIAC, PIAC (never imported by inference)."""
