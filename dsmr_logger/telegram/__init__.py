"""What the bytes mean: reading values out of a telegram."""
