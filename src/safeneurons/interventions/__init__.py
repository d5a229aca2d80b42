"""What a mask is used for: freezing (static, dynamic), pruning, ActSVD low-rank removal, rewinding."""
