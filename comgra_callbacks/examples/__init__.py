"""Examples shipped with comgra_callbacks (custom dashboard views)."""
