"""What the ideas and scripts share and no idea teaches: errors, devices and plotting (common),
the typed command line (config), checkpoints and their folders (checkpoints)."""
