"""Lightning modules written the way users already write them, to show the strategy dropping into them."""
