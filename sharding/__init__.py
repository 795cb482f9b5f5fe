"""Device meshes and the logical-axis rules that place parameters and activations on them."""
