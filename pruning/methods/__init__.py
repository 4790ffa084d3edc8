"""Built-in pruning methods beyond ``none`` and ``litelvlm``; importing this package registers them."""
