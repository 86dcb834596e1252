"""Solutions of the exercises, one file each, kept apart from the stubs the learner starts from."""
