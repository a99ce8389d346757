"""absl launchers for mtl_dist (`mtl-train`)."""
