"""The refinement pass between epochs: label update, statistics, text fitting."""
