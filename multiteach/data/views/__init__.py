"""Views of decoded tiles (a bottom data floor: no files, no slides): pathology augmentations, seeded multi-crop
views, iBOT masks and the photometric perturbations of robust views and held-out severities."""
