"""Built-in wsss-bench plugins, registered through the ``wsss_bench`` entry-point group."""
