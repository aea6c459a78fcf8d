"""What a job reads (frozen inputs, image files) and what it writes (row shards)."""
