"""Experiments built on the training loop: the seed article's teacher-student recipe (teacher_student)."""
