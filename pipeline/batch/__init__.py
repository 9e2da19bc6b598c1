"""One slide of a batch end to end (`run_slide`), the slide list (`manifest`), claims on
slides shared by concurrent batches (`claims`) and the morning-after report (`report`)."""
